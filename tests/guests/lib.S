# Shared routines of the 64-bit test guests. Entered through the Linux 64-bit
# boot protocol: long mode, identity paging of 0..4 GiB, RSI = zero page.
# Every guest reports on COM1 with lines starting "VMM-GUEST: ".

.set COM1, 0x3f8
.set I8042_CMD, 0x64
.set ACPI_SLEEP_CTL_DEFAULT, 0x600

.text
# putc: %al -> COM1, after waiting for the transmit holding register to be empty.
putc:
    push %rdx
    push %rax
    mov $COM1 + 5, %dx
1:  inb %dx, %al
    test $0x20, %al
    jz 1b
    pop %rax
    mov $COM1, %dx
    outb %al, %dx
    pop %rdx
    ret

# getc: waits for a byte on COM1 (polling the line status register's data
# ready bit) and returns it in %al.
getc:
    push %rdx
    mov $COM1 + 5, %dx
1:  inb %dx, %al
    test $1, %al
    jz 1b
    mov $COM1, %dx
    inb %dx, %al
    pop %rdx
    ret

# puts: NUL-terminated string at %rsi.
puts:
    push %rsi
    push %rax
1:  lodsb
    test %al, %al
    jz 2f
    call putc
    jmp 1b
2:  pop %rax
    pop %rsi
    ret

# puthex: %rax as 16 hex digits.
puthex:
    push %rax
    push %rcx
    push %rdx
    mov %rax, %rdx
    mov $16, %ecx
1:  rol $4, %rdx
    mov %dl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 2f
    add $'a' - '0' - 10, %al
2:  call putc
    dec %ecx
    jnz 1b
    pop %rdx
    pop %rcx
    pop %rax
    ret

# space / newline
putsp:
    push %rax
    mov $' ', %al
    call putc
    pop %rax
    ret
putnl:
    push %rax
    mov $'\n', %al
    call putc
    pop %rax
    ret

# reset: pulse the CPU reset line through the i8042, as Linux's reboot=k does.
reset:
    mov $I8042_CMD, %dx
    mov $0xfe, %al
    outb %al, %dx
1:  hlt
    jmp 1b
