"""clipadapt's Hydra launcher plugin (`hydra/launcher=batched`, or `launcher=batched` through conf/launcher/)."""
