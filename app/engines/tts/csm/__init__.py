"""Sesame CSM-1B text-to-speech: Llama backbone + depth decoder (torchtune) and the Mimi codec (moshi).

model.py    the network (readable top to bottom, shapes in comments)
loader.py   its files (each reference resolved by app/engines/models.py), checkpoint layouts, tokenizer, Mimi
generator.py  frame step, on-device sampling, stops, streaming Mimi decode, context segments
engine.py   the TtsEngine and load_csm_engine (cheap to import: no torch)
settings.py its settings (cheap to import too)
"""
