# A minimal virtio-blk driver over virtio-mmio (virtio 1.2, split queue of 8),
# polling the used ring with interrupts off. Against the first device at
# 0xd0000000 it: reads the serial (GET_ID), reads sectors 0-7 and prints their
# byte sum and first 8 bytes, writes a pattern to sectors 8-15, flushes, prints
# every status, and halts so the host can kill the VMM and check the file.
.include "lib.S"
.set QSZ, 8
.include "virtio_lib.S"

.text
.globl _start
_start:
    call blk_start

    # GET_ID into buf, printed as a string.
    movb $0, buf + 20(%rip)
    mov $T_GET_ID, %edi
    xor %esi, %esi
    mov $20, %edx
    mov $F_WRITE, %ecx
    lea buf(%rip), %r8
    call request
    lea m_id(%rip), %rsi
    call puts
    call puthex
    call putsp
    lea buf(%rip), %rsi
    call puts
    call putnl

    # Read sectors 0-7.
    mov $T_IN, %edi
    xor %esi, %esi
    mov $4096, %edx
    mov $F_WRITE, %ecx
    lea buf(%rip), %r8
    call request
    lea m_read(%rip), %rsi
    call puts
    call puthex
    call putsp
    lea buf(%rip), %rsi
    xor %eax, %eax
    xor %ecx, %ecx
1:  movzbq (%rsi,%rcx), %rdx
    add %rdx, %rax
    inc %ecx
    cmp $4096, %ecx
    jb 1b
    call puthex
    call putsp
    mov buf(%rip), %rax
    bswap %rax
    call puthex
    call putnl

    # Write byte i = (13 * i + 7) mod 256 to sectors 8-15.
    lea buf(%rip), %rdi
    xor %ecx, %ecx
2:  mov %ecx, %eax
    imul $13, %eax
    add $7, %eax
    mov %al, (%rdi,%rcx)
    inc %ecx
    cmp $4096, %ecx
    jb 2b
    mov $T_OUT, %edi
    mov $8, %esi
    mov $4096, %edx
    xor %ecx, %ecx
    lea buf(%rip), %r8
    call request
    lea m_write(%rip), %rsi
    call puts
    call puthex
    call putnl

    call blk_flush
    lea m_flush(%rip), %rsi
    call puts
    call puthex
    call putnl
    lea m_done(%rip), %rsi
    call puts
    cli
3:  hlt
    jmp 3b

m_id:    .asciz "VMM-GUEST: get_id status "
m_read:  .asciz "VMM-GUEST: read status "
m_write: .asciz "VMM-GUEST: write status "
m_flush: .asciz "VMM-GUEST: flush status "
m_done:  .asciz "VMM-GUEST: flushed, halting\n"

.include "virtio_blk_lib.S"
