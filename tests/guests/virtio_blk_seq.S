# Writes sectors 0-63 of the first virtio-blk device one request at a time,
# sector i filled with the byte (37 * i + 11) mod 256, printing
# "VMM-GUEST: wrote N status S" after each and pacing the requests by 2000
# port-0x80 exits (as counter.S does), so a snapshot falls between requests
# or while one is in flight. Then flushes, prints
# "VMM-GUEST: all written, flush status S" and halts.
.include "lib.S"
.set QSZ, 8
.include "virtio_lib.S"
.set SECTORS, 64

.text
.globl _start
_start:
    call blk_start
    xor %r12, %r12
1:  mov %r12d, %eax                   # the sector's byte
    imul $37, %eax
    add $11, %eax
    lea buf(%rip), %rdi
    xor %ecx, %ecx
2:  mov %al, (%rdi,%rcx)
    inc %ecx
    cmp $512, %ecx
    jb 2b
    mov $T_OUT, %edi
    mov %r12, %rsi
    mov $512, %edx
    xor %ecx, %ecx
    lea buf(%rip), %r8
    call request
    lea m_wrote(%rip), %rsi
    call puts
    xchg %rax, %r12
    call puthex
    xchg %rax, %r12
    call putsp
    call puthex
    call putnl
    mov $2000, %rcx
3:  outb %al, $0x80
    dec %rcx
    jnz 3b
    inc %r12
    cmp $SECTORS, %r12
    jb 1b

    call blk_flush
    lea m_done(%rip), %rsi
    call puts
    call puthex
    call putnl
    cli
4:  hlt
    jmp 4b

m_wrote: .asciz "VMM-GUEST: wrote "
m_done:  .asciz "VMM-GUEST: all written, flush status "

.include "virtio_blk_lib.S"
