"""keysvc: cryptographic sealing and key management for payment systems."""
