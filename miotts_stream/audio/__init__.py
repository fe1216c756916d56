"""Audio out: fidelity measures, resampling and encoders (PCM, Opus, Ogg Opus, G.711)."""
