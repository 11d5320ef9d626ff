# Console routines of the 32-bit (PVH) test guests: COM1 output after waiting
# for an empty transmit holding register.
.set COM1, 0x3f8

# The ELF note XEN_ELFNOTE_PHYS32_ENTRY that makes a VMM enter the guest through
# PVH at `entry`.
.macro PVH_ENTRY_NOTE entry
    .pushsection .note.pvh, "a", @note
    .balign 4
    .long 4                  # name size: "Xen\0"
    .long 4                  # descriptor size
    .long 18                 # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .long \entry
    .popsection
.endm

.text
.code32
putc:
    push %edx
    push %eax
    mov $COM1 + 5, %dx
3:  inb %dx, %al
    test $0x20, %al
    jz 3b
    pop %eax
    mov $COM1, %dx
    outb %al, %dx
    pop %edx
    ret
puts:
    push %eax
4:  lodsb
    test %al, %al
    jz 5f
    call putc
    jmp 4b
5:  pop %eax
    ret
putnl:
    push %eax
    mov $'\n', %al
    call putc
    pop %eax
    ret
puthex:                               # %eax as 8 hex digits
    push %ecx
    push %edx
    mov %eax, %edx
    mov $8, %ecx
6:  rol $4, %edx
    mov %dl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 7f
    add $'a' - '0' - 10, %al
7:  call putc
    dec %ecx
    jnz 6b
    pop %edx
    pop %ecx
    ret

