# virtio-blk benchmark guest entered through PVH (32-bit protected mode, no
# paging), so that vmm and QEMU run the very same guest: it finds the first
# virtio-mmio device in the command line ("virtio_mmio.device=SIZE@0xADDR:IRQ",
# which both VMMs generate), brings it up with a polling driver, then does
# RANDOM_READS random 4 KiB reads and sequential 64 KiB reads over the first
# 64 MiB (or the whole disk), printing a line before and after each phase.
# Ends with a write to port 0xf4 (QEMU's isa-debug-exit) and halts.
.include "lib32.S"
.set QSZ, 8
.set RANDOM_READS, 20000

PVH_ENTRY_NOTE pvh_start

.text
.code32
.globl _start
_start:
pvh_start:
    mov $stack_top, %esp
    mov 24(%ebx), %esi                # start_info.cmdline_paddr (low half)
    call find_device                  # -> %ebp = MMIO base
    mov $m_dev, %esi
    call puts
    mov %ebp, %eax
    call puthex
    call putnl
    cmpl $0x74726976, 0x000(%ebp)     # "virt"
    jne fail
    cmpl $2, 0x004(%ebp)              # modern interface only
    jne fail
    cmpl $2, 0x008(%ebp)              # block
    jne fail
    movl $0, 0x070(%ebp)
    movl $1, 0x070(%ebp)
    movl $3, 0x070(%ebp)
    movl $1, 0x024(%ebp)
    movl $1, 0x020(%ebp)              # VERSION_1 only
    movl $0, 0x024(%ebp)
    movl $0, 0x020(%ebp)
    movl $11, 0x070(%ebp)
    testl $8, 0x070(%ebp)
    jz fail
    movl $0, 0x030(%ebp)
    movl $QSZ, 0x038(%ebp)
    movl $desc, 0x080(%ebp)
    movl $0, 0x084(%ebp)
    movl $avail, 0x090(%ebp)
    movl $0, 0x094(%ebp)
    movl $used, 0x0a0(%ebp)
    movl $0, 0x0a4(%ebp)
    movl $1, 0x044(%ebp)
    movl $15, 0x070(%ebp)
    mov 0x100(%ebp), %eax             # capacity (sectors, low half)
    shr $3, %eax                      # 4 KiB blocks
    mov %eax, blocks

    mov $m_start, %esi
    call puts
    mov $RANDOM_READS, %edi
    mov $0x9e3779b9, %ecx             # xorshift32 state
1:  mov %ecx, %eax
    shl $13, %eax
    xor %eax, %ecx
    mov %ecx, %eax
    shr $17, %eax
    xor %eax, %ecx
    mov %ecx, %eax
    shl $5, %eax
    xor %eax, %ecx
    mov %ecx, %eax
    xor %edx, %edx
    divl blocks
    lea (,%edx,8), %eax               # sector
    push %ecx
    push %edi
    mov $buf, %edi
    mov $4096, %ecx
    call read
    pop %edi
    pop %ecx
    test %eax, %eax
    jnz fail
    dec %edi
    jnz 1b
    mov $m_random, %esi
    call puts

    mov blocks, %edi
    shl $3, %edi                      # sectors
    cmp $(64 * 2048), %edi
    jbe 2f
    mov $(64 * 2048), %edi
2:  and $~127, %edi
    xor %esi, %esi
3:  cmp %edi, %esi
    jae 4f
    mov %esi, %eax
    push %esi
    push %edi
    mov $bigbuf, %edi
    mov $65536, %ecx
    call read
    pop %edi
    pop %esi
    test %eax, %eax
    jnz fail
    add $128, %esi
    jmp 3b
4:  mov $m_seq, %esi
    call puts
    mov $0xf4, %dx
    xor %al, %al
    outb %al, %dx
5:  cli
    hlt
    jmp 5b
fail:
    mov $m_fail, %esi
    call puts
    jmp 4b

# find_device: %esi = NUL-terminated cmdline; %ebp = address after the first
# "virtio_mmio.device=...@0x", or 0xd0000000 if there is none.
find_device:
    mov $0xd0000000, %ebp
1:  cmpb $0, (%esi)
    je 9f
    mov $key, %edi
    mov %esi, %edx
2:  movb (%edi), %al
    test %al, %al
    jz 3f                             # key matched
    cmpb (%edx), %al
    jne 8f
    inc %edi
    inc %edx
    jmp 2b
3:  cmpb $'@', (%edx)                 # skip the size
    je 4f
    cmpb $0, (%edx)
    je 9f
    inc %edx
    jmp 3b
4:  add $3, %edx                      # "@0x"
    xor %ebp, %ebp
5:  movzbl (%edx), %eax
    sub $'0', %eax
    cmp $9, %eax
    jbe 6f
    movzbl (%edx), %eax
    or $0x20, %eax
    sub $'a', %eax
    cmp $5, %eax
    ja 9f
    add $10, %eax
6:  shl $4, %ebp
    or %eax, %ebp
    inc %edx
    jmp 5b
8:  inc %esi
    jmp 1b
9:  ret

# read: sector %eax, %ecx bytes into %edi. Returns the status in %eax.
read:
    movl $0, hdr                      # VIRTIO_BLK_T_IN
    movl $0, hdr + 4
    mov %eax, hdr + 8
    movl $0, hdr + 12
    movl $hdr, desc + 0
    movl $0, desc + 4
    movl $16, desc + 8
    movw $1, desc + 12                # NEXT
    movw $1, desc + 14
    mov %edi, desc + 16
    movl $0, desc + 20
    mov %ecx, desc + 24
    movw $3, desc + 28                # NEXT | WRITE
    movw $2, desc + 30
    movl $status, desc + 32
    movl $0, desc + 36
    movl $1, desc + 40
    movw $2, desc + 44                # WRITE
    movw $0, desc + 46
    movb $0xff, status
    movzwl avail + 2, %eax
    mov %eax, %edx
    and $(QSZ - 1), %eax
    movw $0, avail + 4(,%eax,2)
    inc %edx
    movw %dx, avail + 2
    movl $0, 0x050(%ebp)              # notify
1:  cmpw %dx, used + 2
    jne 1b
    movzbl status, %eax
    ret

key:      .asciz "virtio_mmio.device="
m_dev:    .asciz "VMM-GUEST: virtio-blk at "
m_start:  .asciz "VMM-GUEST: bench start\n"
m_random: .asciz "VMM-GUEST: bench random done\n"
m_seq:    .asciz "VMM-GUEST: bench sequential done\n"
m_fail:   .asciz "VMM-GUEST: bench request failed\n"

.bss
.balign 4096
buf:    .skip 4096
bigbuf: .skip 65536
.balign 16
desc:   .skip 16 * QSZ
avail:  .skip 4 + 2 * QSZ + 2
.balign 4
used:   .skip 4 + 8 * QSZ + 2
.balign 16
hdr:    .skip 16
status: .skip 4
blocks: .skip 4
.balign 16
        .skip 8192
stack_top:
