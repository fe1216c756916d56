"""miotts-stream: low-latency streaming speech service for MioTTS."""
