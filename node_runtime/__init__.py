"""node-runtime: what runs on each Azure Batch compute node of an mpilaunch multi-instance task.

No Azure SDK is imported here or by the CLI: nodes need only the standard library, psutil and cryptography
(and OpenSSH, flock and an MPI).
"""
