# Counts for ever: prints "VMM-GUEST: count N" with N = 1, 2, 3, ... (16 hex
# digits), one line per 2000 writes to port 0x80 (each a VM exit: a few ms
# per line on any host; no timer, no interrupts). It first writes 123 to the boot timer. Used to show that a paused guest runs no
# instruction and that a resumed one continues where it stopped.
.include "lib.S"
.globl _start
_start:
    # Boot complete, as Firecracker's guests signal it (logged with --boot-timer).
    mov $0xc0000000, %rax
    movb $123, (%rax)
    xor %r12, %r12
1:
    inc %r12
    lea msg(%rip), %rsi
    call puts
    mov %r12, %rax
    call puthex
    call putnl
    # Pace by VM exits, not instructions: a busy loop's speed differs by
    # 100x between hardware and an emulating host; an exit costs about the same.
    mov $2000, %rcx
2:
    outb %al, $0x80
    dec %rcx
    jnz 2b
    jmp 1b
msg: .asciz "VMM-GUEST: count "
