# Prints a line on the serial port, then resets through the i8042.
.include "lib.S"
.globl _start
_start:
    lea msg(%rip), %rsi
    call puts
    jmp reset
msg: .asciz "VMM-GUEST: hello from the test guest\n"
