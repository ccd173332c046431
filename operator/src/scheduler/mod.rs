//! ringmaster-scheduler: gang placement on Kubernetes (see the module files).
