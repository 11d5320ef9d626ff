# A minimal virtio-blk driver over virtio-mmio (virtio 1.2, split queue of 8),
# polling the used ring with interrupts off. Against the first device at
# 0xd0000000 it: reads the serial (GET_ID), reads sectors 0-7 and prints their
# byte sum and first 8 bytes, writes a pattern to sectors 8-15, flushes, prints
# every status, and halts so the host can kill the VMM and check the file.
.include "lib.S"
.set MMIO, 0xd0000000
.set QSZ, 8
.set T_IN, 0
.set T_OUT, 1
.set T_FLUSH, 4
.set T_GET_ID, 8
.set F_NEXT, 1
.set F_WRITE, 2

.globl _start
_start:
    mov $MMIO, %rbx
    cmpl $0x74726976, 0x000(%rbx)     # "virt"
    jne no_device
    cmpl $2, 0x008(%rbx)              # block device
    jne no_device
    movl $0, 0x070(%rbx)              # reset
    movl $1, 0x070(%rbx)              # ACKNOWLEDGE
    movl $3, 0x070(%rbx)              # DRIVER
    movl $1, 0x014(%rbx)              # device features, high word
    testl $1, 0x010(%rbx)             # VERSION_1
    jz bad_features
    movl $0, 0x024(%rbx)
    movl $(1 << 9), 0x020(%rbx)       # FLUSH
    movl $1, 0x024(%rbx)
    movl $1, 0x020(%rbx)              # VERSION_1
    movl $11, 0x070(%rbx)             # FEATURES_OK
    testl $8, 0x070(%rbx)
    jz bad_features
    movl $0, 0x030(%rbx)              # queue 0
    cmpl $QSZ, 0x034(%rbx)
    jb bad_features
    movl $QSZ, 0x038(%rbx)
    lea desc(%rip), %rax
    movl %eax, 0x080(%rbx)
    movl $0, 0x084(%rbx)
    lea avail(%rip), %rax
    movl %eax, 0x090(%rbx)
    movl $0, 0x094(%rbx)
    lea used(%rip), %rax
    movl %eax, 0x0a0(%rbx)
    movl $0, 0x0a4(%rbx)
    movl $1, 0x044(%rbx)              # queue ready
    movl $15, 0x070(%rbx)             # DRIVER_OK

    # GET_ID into buf, printed as a string.
    movb $0, buf + 20(%rip)
    mov $T_GET_ID, %edi
    xor %esi, %esi
    mov $20, %edx
    mov $F_WRITE, %ecx
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
    call request
    lea m_write(%rip), %rsi
    call puts
    call puthex
    call putnl

    mov $T_FLUSH, %edi
    xor %esi, %esi
    xor %edx, %edx
    xor %ecx, %ecx
    call request
    lea m_flush(%rip), %rsi
    call puts
    call puthex
    call putnl
    lea m_done(%rip), %rsi
    call puts
    cli
3:  hlt
    jmp 3b

no_device:
    lea m_nodev(%rip), %rsi
    call puts
    jmp reset
bad_features:
    lea m_badf(%rip), %rsi
    call puts
    jmp reset

# request: type %edi, sector %rsi, data length %edx (0: none), data flags %ecx.
# Returns the status byte in %rax.
request:
    push %rbx
    lea hdr(%rip), %r8
    movl %edi, 0(%r8)
    movl $0, 4(%r8)
    mov %rsi, 8(%r8)
    lea desc(%rip), %r9
    mov %r8, 0(%r9)                   # desc 0: header
    movl $16, 8(%r9)
    movw $F_NEXT, 12(%r9)
    movw $1, 14(%r9)
    test %edx, %edx
    jz 1f
    lea buf(%rip), %rax               # desc 1: data
    mov %rax, 16(%r9)
    movl %edx, 24(%r9)
    or $F_NEXT, %ecx
    movw %cx, 28(%r9)
    movw $2, 30(%r9)
    jmp 2f
1:  movw $2, 14(%r9)                  # no data: header -> status
2:  lea status(%rip), %rax            # desc 2: status
    movb $0xff, (%rax)
    mov %rax, 32(%r9)
    movl $1, 40(%r9)
    movw $F_WRITE, 44(%r9)
    movw $0, 46(%r9)
    lea avail(%rip), %r10
    movzwl 2(%r10), %eax              # avail idx
    mov %eax, %r11d
    and $(QSZ - 1), %eax
    movw $0, 4(%r10,%rax,2)           # ring entry: head 0
    inc %r11d
    movw %r11w, 2(%r10)               # publish
    movl $0, 0x050(%rbx)              # notify queue 0
    lea used(%rip), %r10
3:  movzwl 2(%r10), %eax              # wait for the used index to catch up
    cmp %r11w, %ax
    jne 3b
    movzbq status(%rip), %rax
    pop %rbx
    ret

m_id:    .asciz "VMM-GUEST: get_id status "
m_read:  .asciz "VMM-GUEST: read status "
m_write: .asciz "VMM-GUEST: write status "
m_flush: .asciz "VMM-GUEST: flush status "
m_done:  .asciz "VMM-GUEST: flushed, halting\n"
m_nodev: .asciz "VMM-GUEST: no virtio-blk device\n"
m_badf:  .asciz "VMM-GUEST: feature negotiation failed\n"

.bss
.balign 4096
buf:    .skip 4096 + 32
.balign 16
desc:   .skip 16 * QSZ
.balign 2
avail:  .skip 4 + 2 * QSZ + 2
.balign 4
used:   .skip 4 + 8 * QSZ + 2
.balign 16
hdr:    .skip 16
status: .skip 1
