# Reads a line from COM1 by polling the line status register, prints it back,
# then resets: proves host input reaches the guest through the UART.
.include "lib.S"
.globl _start
_start:
    lea ready(%rip), %rsi
    call puts
    lea line(%rip), %rdi
1:  call getc
    cmp $'\n', %al
    je 3f
    stosb
    lea line_end(%rip), %rax
    cmp %rax, %rdi
    jb 1b
3:  movb $0, (%rdi)
    lea got(%rip), %rsi
    call puts
    lea line(%rip), %rsi
    call puts
    call putnl
    jmp reset
ready: .asciz "VMM-GUEST: ready for input\n"
got:   .asciz "VMM-GUEST: got "
line:  .skip 200
line_end: .byte 0
