"""`kgen caption`'s library: caption a training dataset's images from their tag files.

Modules: `discovery` (images, headers, tag files), `shaping` (kohya-style tag shaping),
`templates` (caption prompt templates), `wiki` (Danbooru wiki text and the description cache),
`backends` (llama.cpp in process, or an OpenAI-compatible server), `output` (sidecars, atomic
writes), `run` (the stages). See docs/caption.md.
"""
