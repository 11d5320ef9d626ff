# A minimal polling virtio-blk driver over virtio-mmio (virtio 1.2, one split
# queue of QSZ descriptors), shared by the virtio test guests. Interrupts stay
# off: the driver polls the used ring.
.set MMIO, 0xd0000000
.set QSZ, 8
.set T_IN, 0
.set T_OUT, 1
.set T_FLUSH, 4
.set T_GET_ID, 8
.set F_NEXT, 1
.set F_WRITE, 2

.text
# vblk_init: brings up the device at MMIO; returns with %rbx = MMIO. Resets the
# VM with a message if there is no block device or negotiation fails.
vblk_init:
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
    ret

no_device:
    lea m_nodev(%rip), %rsi
    call puts
    jmp reset
bad_features:
    lea m_badf(%rip), %rsi
    call puts
    jmp reset

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
