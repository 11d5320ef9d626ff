# For tools/bench-diff.py: prints "VMM-GUEST: ready", then for each byte B
# typed on COM1 writes the step count into one byte of each 4 KiB page of
# the B * 8 MiB of memory from 32 MiB on (every page of that range changes),
# and prints "VMM-GUEST: dirtied". Stays below 1 GiB, which every VMM's
# boot page tables map.
.include "lib.S"
.set BASE, 0x2000000

.text
.globl _start
_start:
    lea m_ready(%rip), %rsi
    call puts
    call putnl
    xor %r12, %r12                    # steps
wait:
    call getc
    inc %r12
    movzbq %al, %rcx
    shl $23, %rcx                     # B * 8 MiB
    mov $BASE, %rdi
    add %rdi, %rcx                    # end
2:  mov %r12b, (%rdi)
    add $4096, %rdi
    cmp %rcx, %rdi
    jb 2b
    lea m_done(%rip), %rsi
    call puts
    call putnl
    jmp wait

m_ready: .asciz "VMM-GUEST: ready"
m_done:  .asciz "VMM-GUEST: dirtied"
