"""Node providers: where the emulator's compute nodes live (:mod:`.base` is the interface, :mod:`.process` the
default provider of loopback-address nodes on this machine)."""
