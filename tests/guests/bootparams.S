# Reads back what the VMM put in the zero page: the e820 map, the command line
# the RSDP address and the initrd, and prints them; then resets.
.include "lib.S"
.globl _start
_start:
    mov %rsi, %rbx                  # zero page
    lea m_count(%rip), %rsi
    call puts
    movzbq 0x1e8(%rbx), %rax        # e820_entries
    mov %rax, %r12
    call puthex
    call putnl
    lea 0x2d0(%rbx), %r13           # e820_table, 20-byte entries
1:  test %r12, %r12
    jz 2f
    lea m_entry(%rip), %rsi
    call puts
    mov 0(%r13), %rax
    call puthex
    call putsp
    mov 8(%r13), %rax
    call puthex
    call putsp
    mov 16(%r13), %eax
    call puthex
    call putnl
    add $20, %r13
    dec %r12
    jmp 1b
2:  lea m_rsdp(%rip), %rsi
    call puts
    mov 0x70(%rbx), %rax            # acpi_rsdp_addr
    call puthex
    call putnl
    lea m_initrd(%rip), %rsi
    call puts
    mov 0x218(%rbx), %eax           # hdr.ramdisk_image
    mov %rax, %r12
    call puthex
    call putsp
    mov 0x21c(%rbx), %eax           # hdr.ramdisk_size
    call puthex
    call putsp
    xor %eax, %eax
    test %r12, %r12
    jz 3f
    mov (%r12), %rax                # first 8 bytes of the initrd
    bswap %rax                      # print them in memory order
3:  call puthex
    call putnl
    lea m_cmdline(%rip), %rsi
    call puts
    mov 0x228(%rbx), %esi           # hdr.cmd_line_ptr
    call puts
    call putnl
    jmp reset
m_count:   .asciz "VMM-GUEST: e820 entries "
m_entry:   .asciz "VMM-GUEST: e820 "
m_rsdp:    .asciz "VMM-GUEST: rsdp "
m_initrd:  .asciz "VMM-GUEST: initrd "
m_cmdline: .asciz "VMM-GUEST: cmdline "
