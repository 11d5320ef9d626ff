# A minimal virtio-blk driver over virtio-mmio (virtio 1.2, split queue of 8),
# polling the used ring with interrupts off. Against the first device at
# 0xd0000000 it: reads the serial (GET_ID), reads sectors 0-7 and prints their
# byte sum and first 8 bytes, writes a pattern to sectors 8-15, flushes, prints
# every status, and halts so the host can kill the VMM and check the file.
.include "lib.S"
.set QSZ, 8
.include "virtio_lib.S"
.set T_IN, 0
.set T_OUT, 1
.set T_FLUSH, 4
.set T_GET_ID, 8

.text
.globl _start
_start:
    mov $2, %edi                      # block device
    mov $(1 << 9), %esi               # FLUSH
    call virtio_init
    xor %edi, %edi
    lea desc(%rip), %rsi
    lea avail(%rip), %rdx
    lea used(%rip), %rcx
    call setup_queue
    movl $15, 0x070(%rbx)             # DRIVER_OK

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

    mov $T_FLUSH, %edi
    xor %esi, %esi
    xor %edx, %edx
    xor %ecx, %ecx
    lea buf(%rip), %r8
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

m_id:    .asciz "VMM-GUEST: get_id status "
m_read:  .asciz "VMM-GUEST: read status "
m_write: .asciz "VMM-GUEST: write status "
m_flush: .asciz "VMM-GUEST: flush status "
m_done:  .asciz "VMM-GUEST: flushed, halting\n"


# request: type %edi, sector %rsi, data length %edx (0: none), data flags %ecx,
# data buffer %r8. Returns the status byte in %rax. Clobbers %r9-%r11.
request:
    lea hdr(%rip), %r9
    movl %edi, 0(%r9)
    movl $0, 4(%r9)
    mov %rsi, 8(%r9)
    lea desc(%rip), %r10
    mov %r9, 0(%r10)                  # desc 0: header
    movl $16, 8(%r10)
    movw $F_NEXT, 12(%r10)
    movw $1, 14(%r10)
    test %edx, %edx
    jz 1f
    mov %r8, 16(%r10)                 # desc 1: data
    movl %edx, 24(%r10)
    or $F_NEXT, %ecx
    movw %cx, 28(%r10)
    movw $2, 30(%r10)
    jmp 2f
1:  movw $2, 14(%r10)                 # no data: header -> status
2:  lea status(%rip), %rax            # desc 2: status
    movb $0xff, (%rax)
    mov %rax, 32(%r10)
    movl $1, 40(%r10)
    movw $F_WRITE, 44(%r10)
    movw $0, 46(%r10)
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
    ret

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
