# virtio-mmio transport routines of the polling test drivers (virtio 1.2, split
# queues of QSZ entries, interrupts never enabled). The including guest sets QSZ.
.set MMIO, 0xd0000000
.set F_NEXT, 1
.set F_WRITE, 2

.text
# virtio_init: resets the device at MMIO, checks it is device type %edi, and
# negotiates VERSION_1 plus the low feature bits %esi (all must be offered).
# Returns with FEATURES_OK set and %rbx = MMIO; resets the VM with a message if
# the device is missing or negotiation fails.
virtio_init:
    mov $MMIO, %rbx
    cmpl $0x74726976, 0x000(%rbx)     # "virt"
    jne no_device
    cmpl %edi, 0x008(%rbx)            # device type
    jne no_device
    movl $0, 0x070(%rbx)              # reset
    movl $1, 0x070(%rbx)              # ACKNOWLEDGE
    movl $3, 0x070(%rbx)              # DRIVER
    movl $1, 0x014(%rbx)              # device features, high word
    testl $1, 0x010(%rbx)             # VERSION_1
    jz bad_features
    movl $0, 0x014(%rbx)
    mov 0x010(%rbx), %eax
    and %esi, %eax
    cmp %esi, %eax
    jne bad_features
    movl $0, 0x024(%rbx)
    movl %esi, 0x020(%rbx)
    movl $1, 0x024(%rbx)
    movl $1, 0x020(%rbx)              # VERSION_1
    movl $11, 0x070(%rbx)             # FEATURES_OK
    testl $8, 0x070(%rbx)
    jz bad_features
    ret

# setup_queue: queue %edi with descriptor table %rsi, available ring %rdx and
# used ring %rcx, QSZ entries; marks it ready.
setup_queue:
    movl %edi, 0x030(%rbx)
    cmpl $QSZ, 0x034(%rbx)
    jb bad_features
    movl $QSZ, 0x038(%rbx)
    movl %esi, 0x080(%rbx)
    shr $32, %rsi
    movl %esi, 0x084(%rbx)
    movl %edx, 0x090(%rbx)
    shr $32, %rdx
    movl %edx, 0x094(%rbx)
    movl %ecx, 0x0a0(%rbx)
    shr $32, %rcx
    movl %ecx, 0x0a4(%rbx)
    movl $1, 0x044(%rbx)              # queue ready
    ret

no_device:
    lea m_nodev(%rip), %rsi
    call puts
    jmp reset
bad_features:
    lea m_badf(%rip), %rsi
    call puts
    jmp reset

m_nodev: .asciz "VMM-GUEST: no virtio device of the expected type\n"
m_badf:  .asciz "VMM-GUEST: feature negotiation failed\n"
