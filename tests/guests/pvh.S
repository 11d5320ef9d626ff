# A PVH guest: the ELF note XEN_ELFNOTE_PHYS32_ENTRY makes the VMM enter it in
# 32-bit protected mode with EBX pointing at hvm_start_info. It writes one byte
# to COM1 first thing (the boot benchmark times it), checks the start info and
# prints its memory map, then exits: port 0xf4 for QEMU's isa-debug-exit, then
# the i8042 reset for vmm.
.include "lib32.S"

PVH_ENTRY_NOTE pvh_start

.text
.code32
.globl _start
_start:
pvh_start:
    mov $COM1, %dx
    mov $'\n', %al
    outb %al, %dx
    mov $stack_top, %esp              # PVH provides no stack
    mov %ebx, %ebp                    # hvm_start_info
    mov $m_entry, %esi
    call puts
    cmpl $0x336ec578, (%ebp)          # magic
    jne bad
    mov $m_magic, %esi
    call puts
    mov 40(%ebp), %edi                # memmap_paddr (low half)
    mov 48(%ebp), %ecx                # memmap_entries
    cmp $16, %ecx                     # print at most 16
    jbe 8f
    mov $16, %ecx
8:  mov 48(%ebp), %eax
    call puthex
    call putnl
1:  test %ecx, %ecx
    jz done
    mov $m_map, %esi
    call puts
    mov 4(%edi), %eax                 # addr
    call puthex
    mov 0(%edi), %eax
    call puthex
    mov $' ', %al
    call putc
    mov 12(%edi), %eax                # size
    call puthex
    mov 8(%edi), %eax
    call puthex
    mov $' ', %al
    call putc
    mov 16(%edi), %eax                # type
    call puthex
    call putnl
    add $24, %edi
    dec %ecx
    jmp 1b
bad:
    mov $m_bad, %esi
    call puts
done:
    mov $0xf4, %dx                    # QEMU isa-debug-exit, if present
    xor %al, %al
    outb %al, %dx
    mov $0x64, %dx                    # i8042 reset
    mov $0xfe, %al
    outb %al, %dx
2:  hlt
    jmp 2b

m_entry: .asciz "VMM-GUEST: pvh entry\n"
m_magic: .asciz "VMM-GUEST: start_info magic ok, memmap entries "
m_map:   .asciz "VMM-GUEST: memmap "
m_bad:   .asciz "VMM-GUEST: bad start_info magic\n"

.bss
.balign 16
stack: .skip 4096
stack_top:
