"""Plugins for voice-agent frameworks, over the conversation WebSocket (`/v1/conversation`).

`miotts_stream.integrations.pipecat.MioTTSService` (extra `miotts-stream[pipecat]`) and
`miotts_stream.integrations.livekit.TTS` (extra `miotts-stream[livekit]`): one connection per
conversation, a context per turn, cancel on interruption, word timings. Import the one you use;
each imports its framework.
"""
