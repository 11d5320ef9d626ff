# Dirties known guest pages on demand, for the Diff snapshot tests. Starts its
# virtio-blk device, prints "VMM-GUEST: ready", then takes one step per byte
# typed on COM1 (polled, lib.S's getc). Step N (1, 2, ...):
#   - checks that the pages of every earlier step still hold what that step
#     left (so a restored guest shows whether its memory came back whole);
#   - fills the 16 pages at PATTERN + (N-1) * 64 KiB with the byte N;
#   - reads the disk's first 4 KiB into the page at READS + (N-1) * 4 KiB
#     (a device's write into guest memory);
#   - prints "VMM-GUEST: step N status S bad B" (S the read's status, B the
#     count of wrong bytes the check found), and waits again.
# Besides these pages it writes only its stack (the page at 0x8000) and its
# queue, request header and status (.bss).
.include "lib.S"
.set QSZ, 8
.include "virtio_lib.S"
.set PATTERN, 0x1000000
.set READS, 0x1800000
.set DISK_BYTE, 0xa5

.text
.globl _start
_start:
    call blk_start
    lea m_ready(%rip), %rsi
    call puts
    call putnl
    xor %r12, %r12                    # steps done
wait:
    call getc
    inc %r12

    # Check steps 1 .. N-1: pattern pages hold their step's byte, read pages
    # the disk's byte. %r13 counts wrong bytes.
    xor %r13, %r13
    mov $1, %r14
2:  cmp %r12, %r14
    jae 5f
    mov %r14, %rdi
    dec %rdi
    shl $16, %rdi
    add $PATTERN, %rdi
    xor %ecx, %ecx
3:  cmpb %r14b, (%rdi,%rcx)
    je 31f
    inc %r13
31: inc %ecx
    cmp $0x10000, %ecx
    jb 3b
    mov %r14, %rdi
    dec %rdi
    shl $12, %rdi
    add $READS, %rdi
    xor %ecx, %ecx
4:  cmpb $DISK_BYTE, (%rdi,%rcx)
    je 41f
    inc %r13
41: inc %ecx
    cmp $0x1000, %ecx
    jb 4b
    inc %r14
    jmp 2b

    # Fill this step's 16 pages with the byte N.
5:  mov %r12, %rdi
    dec %rdi
    shl $16, %rdi
    add $PATTERN, %rdi
    xor %ecx, %ecx
6:  movb %r12b, (%rdi,%rcx)
    inc %ecx
    cmp $0x10000, %ecx
    jb 6b

    # Read sectors 0-7 into this step's read page.
    mov %r12, %r8
    dec %r8
    shl $12, %r8
    add $READS, %r8
    mov $T_IN, %edi
    xor %esi, %esi
    mov $4096, %edx
    mov $F_WRITE, %ecx
    call request
    mov %rax, %r15

    lea m_step(%rip), %rsi
    call puts
    mov %r12, %rax
    call puthex
    lea m_status(%rip), %rsi
    call puts
    mov %r15, %rax
    call puthex
    lea m_bad(%rip), %rsi
    call puts
    mov %r13, %rax
    call puthex
    call putnl
    jmp wait

m_ready:  .asciz "VMM-GUEST: ready"
m_step:   .asciz "VMM-GUEST: step "
m_status: .asciz " status "
m_bad:    .asciz " bad "

.include "virtio_blk_lib.S"
