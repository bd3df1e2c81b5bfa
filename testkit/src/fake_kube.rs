//! A fake Kubernetes API server that records every request (being written).
