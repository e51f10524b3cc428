"""A local Azure Batch service: the REST API subset mpilaunch uses, driven by the unmodified azure-batch SDK.

Wire half: :mod:`.server` (HTTP + routing), :mod:`.auth` (SharedKey), ``api_*`` (one module per resource family),
:mod:`.validation`, :mod:`.wire_errors`, :mod:`.store` (SQLite state, the contract with the execution half).
Execution half: :mod:`.engine` and :mod:`.nodes` (node providers). ``mpilaunch emulator serve`` starts it.
"""
