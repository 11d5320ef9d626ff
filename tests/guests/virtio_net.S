# A minimal polling virtio-net driver over virtio-mmio (virtio 1.2, split
# queues, interrupts off) against the only device at 0xd0000000. It takes
# VERSION_1 and MAC only, posts four receive buffers filled with 0xaa, sends
# one broadcast frame of EtherType 0x88b5 from the device's MAC, then waits for
# a frame of EtherType 0x88b6 (others are given back to the device), prints it
# with its virtio-net header, and resets.
.include "lib.S"
.set QSZ, 8
.include "virtio_lib.S"

.set NRX, 4
.set RXBUF, 2048
.set HDR, 12
.set TXLEN, 14 + 64

.text
.globl _start
_start:
    mov $1, %edi                      # network device
    mov $(1 << 5), %esi               # MAC
    call virtio_init

    # The MAC from the configuration space becomes the frame's source address.
    lea txframe + 6(%rip), %rdi
    xor %ecx, %ecx
1:  movb 0x100(%rbx,%rcx), %al
    movb %al, (%rdi,%rcx)
    inc %ecx
    cmp $6, %ecx
    jb 1b
    lea m_mac(%rip), %rsi
    call puts
    lea txframe + 6(%rip), %rsi
    mov $6, %ecx
    call putbytes
    call putnl

    # Receive queue 0: NRX buffers of RXBUF bytes, filled with 0xaa so that the
    # header's num_buffers shows whether the device wrote it.
    lea rxbufs(%rip), %rdi
    mov $0xaa, %al
    mov $(NRX * RXBUF), %ecx
    rep stosb
    lea rxdesc(%rip), %rdi
    lea rxbufs(%rip), %rax
    xor %ecx, %ecx
2:  mov %rax, 0(%rdi)
    movl $RXBUF, 8(%rdi)
    movw $F_WRITE, 12(%rdi)
    movw $0, 14(%rdi)
    lea rxavail(%rip), %rdx
    movw %cx, 4(%rdx,%rcx,2)
    add $RXBUF, %rax
    add $16, %rdi
    inc %ecx
    cmp $NRX, %ecx
    jb 2b
    movw $NRX, rxavail + 2(%rip)
    xor %edi, %edi
    lea rxdesc(%rip), %rsi
    lea rxavail(%rip), %rdx
    lea rxused(%rip), %rcx
    call setup_queue

    # Transmit queue 1: header then frame, as one chain of two descriptors.
    lea txframe + 14(%rip), %rdi
    xor %ecx, %ecx
3:  mov %ecx, %eax
    imul $7, %eax
    add $3, %eax
    mov %al, (%rdi,%rcx)
    inc %ecx
    cmp $64, %ecx
    jb 3b
    lea txdesc(%rip), %rdi
    lea txhdr(%rip), %rax
    mov %rax, 0(%rdi)
    movl $HDR, 8(%rdi)
    movw $F_NEXT, 12(%rdi)
    movw $1, 14(%rdi)
    lea txframe(%rip), %rax
    mov %rax, 16(%rdi)
    movl $TXLEN, 24(%rdi)
    movw $0, 28(%rdi)
    movw $0, 30(%rdi)
    mov $1, %edi
    lea txdesc(%rip), %rsi
    lea txavail(%rip), %rdx
    lea txused(%rip), %rcx
    call setup_queue

    movl $15, 0x070(%rbx)             # DRIVER_OK
    movl $0, 0x050(%rbx)              # notify: receive buffers posted

    movw $0, txavail + 4(%rip)        # ring entry: head 0
    movw $1, txavail + 2(%rip)        # publish
    movl $1, 0x050(%rbx)              # notify the transmit queue
4:  cmpw $1, txused + 2(%rip)
    jne 4b
    lea m_sent(%rip), %rsi
    call puts

    # Poll the receive used ring; frames of another EtherType go back.
    xor %r12d, %r12d                  # used entries seen
5:  movzwl rxused + 2(%rip), %eax
    cmp %r12w, %ax
    je 5b
    mov %r12d, %eax
    and $(QSZ - 1), %eax
    lea rxused + 4(%rip), %rdx
    mov 0(%rdx,%rax,8), %r13d         # id
    mov 4(%rdx,%rax,8), %r14d         # length, header included
    inc %r12d
    cmp $NRX, %r13d
    jae bad_used
    mov %r13d, %eax
    imul $RXBUF, %eax
    lea rxbufs(%rip), %r15
    add %rax, %r15                    # the buffer
    cmp $(HDR + 14), %r14d
    jb 6f
    cmpw $0xb688, HDR + 12(%r15)      # EtherType 0x88b6, big-endian
    je 7f
6:  movzwl rxavail + 2(%rip), %eax    # not ours: post the buffer again
    mov %eax, %ecx
    and $(QSZ - 1), %ecx
    lea rxavail(%rip), %rdx
    movw %r13w, 4(%rdx,%rcx,2)
    inc %eax
    movw %ax, rxavail + 2(%rip)
    movl $0, 0x050(%rbx)
    jmp 5b

7:  lea m_recv(%rip), %rsi
    call puts
    lea -HDR(%r14), %rax
    call puthex
    lea m_nb(%rip), %rsi
    call puts
    movzwq 10(%r15), %rax
    call puthex
    lea m_hdr(%rip), %rsi
    call puts
    mov %r15, %rsi
    mov $10, %ecx
    call putbytes
    lea m_frame(%rip), %rsi
    call puts
    lea HDR(%r15), %rsi
    lea -HDR(%r14), %ecx
    cmp $256, %ecx
    jbe 8f
    mov $256, %ecx
8:  call putbytes
    call putnl
    jmp reset

# putbytes: %ecx bytes at %rsi as hex pairs.
putbytes:
    push %rsi
    push %rcx
    push %rax
    push %rdx
    test %ecx, %ecx
    jz 3f
1:  movzbl (%rsi), %edx
    mov %edx, %eax
    shr $4, %eax
    call 2f
    mov %edx, %eax
    and $0xf, %eax
    call 2f
    inc %rsi
    dec %ecx
    jnz 1b
    jmp 3f
2:  add $'0', %al
    cmp $'9', %al
    jbe 4f
    add $'a' - '0' - 10, %al
4:  jmp putc
3:  pop %rdx
    pop %rax
    pop %rcx
    pop %rsi
    ret

bad_used:
    lea m_badu(%rip), %rsi
    call puts
    jmp reset

m_mac:   .asciz "VMM-GUEST: mac "
m_sent:  .asciz "VMM-GUEST: frame sent\n"
m_recv:  .asciz "VMM-GUEST: received "
m_nb:    .asciz " num_buffers "
m_hdr:   .asciz " header "
m_frame: .asciz " frame "
m_badu:  .asciz "VMM-GUEST: used ring names a buffer that was not posted\n"

.data
.balign 16
txframe:
    .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff   # broadcast
    .skip 6                                    # source: the device's MAC
    .byte 0x88, 0xb5                           # local experimental EtherType
    .skip 64

.bss
.balign 4096
rxbufs:  .skip NRX * RXBUF
.balign 16
rxdesc:  .skip 16 * QSZ
txdesc:  .skip 16 * QSZ
.balign 2
rxavail: .skip 4 + 2 * QSZ + 2
txavail: .skip 4 + 2 * QSZ + 2
.balign 4
rxused:  .skip 4 + 8 * QSZ + 2
.balign 4
txused:  .skip 4 + 8 * QSZ + 2
.balign 16
txhdr:   .skip HDR
