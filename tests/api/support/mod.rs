//! Test harness: launchers for moto and the Kubernetes emulator, and `spawn_app`.
