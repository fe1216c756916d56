"""What the speech LLM and the codec agree on: MioTTS speech codes `<|s_N|>`, N below
`NUM_SPEECH_CODES`, at `TOKEN_RATE_HZ` codes per second of audio (real time for an LLM)."""

NUM_SPEECH_CODES = 12800
TOKEN_RATE_HZ = 25
