# virtio-blk benchmark guest: N random 4 KiB reads over the whole disk, then
# sequential 64 KiB reads of its first 64 MiB (or the whole disk if smaller).
# Prints a line before and after each phase; the host times them and reads the
# VMM's CPU time in between. Halts at the end.
.include "lib.S"
.include "virtio_lib.S"
.set RANDOM_READS, 20000

.text
.globl _start
_start:
    call vblk_init
    mov 0x100(%rbx), %r12             # capacity in sectors
    lea m_start(%rip), %rsi
    call puts
    mov $RANDOM_READS, %r13d
    mov $0x2545f4914f6cdd1d, %r14     # xorshift state
    shr $3, %r12                      # capacity in 4 KiB blocks
1:  mov %r14, %rax                    # xorshift64
    shl $13, %rax
    xor %rax, %r14
    mov %r14, %rax
    shr $7, %rax
    xor %rax, %r14
    mov %r14, %rax
    shl $17, %rax
    xor %rax, %r14
    mov %r14, %rax
    xor %edx, %edx
    div %r12                          # block = state mod blocks
    lea (,%rdx,8), %rsi               # sector
    mov $T_IN, %edi
    mov $4096, %edx
    mov $F_WRITE, %ecx
    lea buf(%rip), %r8
    call request
    test %eax, %eax
    jnz failed
    dec %r13d
    jnz 1b
    lea m_random(%rip), %rsi
    call puts

    shl $3, %r12                      # back to sectors
    mov $(64 * 2048), %r13            # 64 MiB in sectors
    cmp %r12, %r13
    cmova %r12, %r13
    and $~127, %r13                   # whole 64 KiB chunks
    xor %r14d, %r14d
2:  cmp %r13, %r14
    jae 3f
    mov $T_IN, %edi
    mov %r14, %rsi
    mov $65536, %edx
    mov $F_WRITE, %ecx
    lea bigbuf(%rip), %r8
    call request
    test %eax, %eax
    jnz failed
    add $128, %r14
    jmp 2b
3:  lea m_seq(%rip), %rsi
    call puts
    mov %r13, %rax
    shl $9, %rax
    call puthex
    call putnl
    cli
4:  hlt
    jmp 4b
failed:
    lea m_fail(%rip), %rsi
    call puts
    jmp reset

m_start:  .asciz "VMM-GUEST: bench start\n"
m_random: .asciz "VMM-GUEST: bench random done\n"
m_seq:    .asciz "VMM-GUEST: bench sequential done, bytes "
m_fail:   .asciz "VMM-GUEST: bench request failed\n"

.bss
.balign 4096
bigbuf: .skip 65536
