# Brings up the application processors with INIT-SIPI-SIPI, as an OS does. Every
# CPU prints the initial APIC ID CPUID gives it; the BSP waits until all CPUs the
# VMM announced in CPUID leaf 1 have checked in, then resets.
.include "lib.S"
.set LAPIC_ICR_LOW, 0xfee00300
.set TRAMPOLINE, 0x10000              # SIPI vector 0x10
.globl _start
_start:
    lea m_bsp(%rip), %rsi
    call puts
    mov $1, %eax
    cpuid
    mov %ebx, %eax
    shr $24, %eax
    call puthex
    call putnl
    shr $16, %ebx
    and $0xff, %ebx                   # logical processors announced
    mov %rbx, %r12
    mov $LAPIC_ICR_LOW, %edi
    movl $0x000c4500, (%rdi)          # INIT, assert, all excluding self
    movl $0x000c4610, (%rdi)          # SIPI, vector 0x10
    movl $0x000c4610, (%rdi)          # second SIPI, as the MP spec says
    dec %r12                          # APs expected
1:  movzwq TRAMPOLINE + (ap_count - ap_start), %rax
    cmp %r12, %rax
    jb 1b
    # Wait for the last AP to release the console lock before printing.
2:  movzwq TRAMPOLINE + (ap_lock - ap_start), %rax
    test %rax, %rax
    jnz 2b
    lea m_done(%rip), %rsi
    call puts
    lea 1(%r12), %rax
    call puthex
    call putnl
    jmp reset
m_bsp:  .asciz "VMM-GUEST: cpu up, apic id "
m_done: .asciz "VMM-GUEST: all cpus up: "

# Real-mode AP entry, linked at TRAMPOLINE. CS = 0x1000 after the SIPI.
.section .trampoline, "awx"
.code16
ap_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
1:  lock btsw $0, ap_lock - ap_start
    jc 1b
    mov $ap_msg - ap_start, %si
2:  lodsb
    test %al, %al
    jz 3f
    call ap_putc
    jmp 2b
3:  mov $1, %eax
    cpuid
    shr $24, %ebx                     # initial APIC ID
    mov $8, %cx
4:  rol $4, %ebx                      # print ebx as 8 hex digits... of which the
    mov %bl, %al                      # top 6 are zero; prints 16 to match the BSP
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 5f
    add $'a' - '0' - 10, %al
5:  call ap_putc
    dec %cx
    jnz 4b
    mov $'\n', %al
    call ap_putc
    lock incw ap_count - ap_start
    movw $0, ap_lock - ap_start
6:  hlt
    jmp 6b
ap_putc:
    push %ax
    mov $0x3fd, %dx
7:  inb %dx, %al
    test $0x20, %al
    jz 7b
    pop %ax
    mov $0x3f8, %dx
    outb %al, %dx
    ret
ap_msg:   .asciz "VMM-GUEST: cpu up, apic id 00000000"
.balign 2
ap_lock:  .word 0
ap_count: .word 0
