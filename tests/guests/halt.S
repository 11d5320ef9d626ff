# Announces itself and halts with interrupts off, forever: the VMM must idle
# without burning CPU and still stop cleanly on a signal.
.include "lib.S"
.globl _start
_start:
    lea msg(%rip), %rsi
    call puts
    cli
1:  hlt
    jmp 1b
msg: .asciz "VMM-GUEST: halted\n"
