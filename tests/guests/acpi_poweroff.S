# Finds the ACPI sleep control register the way an OS does (zero page -> RSDP ->
# XSDT -> FADT), checks the signatures on the way, and writes SLP_TYP=5 | SLP_EN.
.include "lib.S"
.globl _start
_start:
    mov 0x70(%rsi), %rbx              # boot_params.acpi_rsdp_addr
    lea m_bad(%rip), %rsi
    movabs $0x2052545020445352, %rax  # "RSD PTR "
    cmp %rax, (%rbx)
    jne fail
    mov 24(%rbx), %rbx                # XsdtAddress
    cmpl $0x54445358, (%rbx)          # "XSDT"
    jne fail
    mov 4(%rbx), %ecx                 # Length
    sub $36, %ecx
    shr $3, %ecx                      # entries
    lea 36(%rbx), %rdx
1:  test %ecx, %ecx
    jz fail
    mov (%rdx), %rdi
    cmpl $0x50434146, (%rdi)          # "FACP"
    je 2f
    add $8, %rdx
    dec %ecx
    jmp 1b
2:  mov 248(%rdi), %rax               # SLEEP_CONTROL_REG.Address
    mov %rax, %r12
    lea m_found(%rip), %rsi
    call puts
    mov %r12, %rax
    call puthex
    call putnl
    mov %r12, %rdx
    mov $(5 << 2) | (1 << 5), %al
    outb %al, %dx
3:  hlt
    jmp 3b
fail:
    call puts
    jmp reset
m_found: .asciz "VMM-GUEST: fadt sleep control register at "
m_bad:   .asciz "VMM-GUEST: acpi tables not found\n"
