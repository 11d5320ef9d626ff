# The virtio-blk request routine of the polling test drivers, with their queue
# and buffers; included at the end of a guest that includes virtio_lib.S.
.set T_IN, 0
.set T_OUT, 1
.set T_FLUSH, 4
.set T_GET_ID, 8

.text
# blk_start: brings up the first device as a block device with FLUSH and its
# queue 0 (QSZ entries), DRIVER_OK set. Returns %rbx = MMIO.
blk_start:
    mov $2, %edi                      # block device
    mov $(1 << 9), %esi               # FLUSH
    call virtio_init
    xor %edi, %edi
    lea desc(%rip), %rsi
    lea avail(%rip), %rdx
    lea used(%rip), %rcx
    call setup_queue
    movl $15, 0x070(%rbx)             # DRIVER_OK
    ret

# blk_flush: a FLUSH request; returns its status in %rax.
blk_flush:
    mov $T_FLUSH, %edi
    xor %esi, %esi
    xor %edx, %edx
    xor %ecx, %ecx
    lea buf(%rip), %r8
    jmp request

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
