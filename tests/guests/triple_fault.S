# Loads an empty IDT and touches unmapped memory: the page fault cannot be
# delivered, nor the double fault after it, so the CPU shuts down (triple fault).
.include "lib.S"
.globl _start
_start:
    lea msg(%rip), %rsi
    call puts
    lidt idt_empty(%rip)
    mov $0x100000000, %rax            # above the 4 GiB identity map
    mov (%rax), %rax
    jmp reset                         # not reached
msg: .asciz "VMM-GUEST: about to triple fault\n"
idt_empty: .word 0
           .quad 0
