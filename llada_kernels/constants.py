"""LLaDA's special token ids and vocabulary size (LLaDA-8B's tokenizer and config.json), in
one place.

They are defaults only: wherever a model is at hand, its config (`mask_token_id`,
`eos_token_id`, `pad_token_id`) decides, so models with small vocabularies work unchanged.
"""

MASK_ID = 126336     # <|mdm_mask|>, the mask token of the diffusion process
BOS_ID = 126080      # <|startoftext|>
EOS_ID = 126081      # <|endoftext|>; LLaDA also pads with it (pad_token_id)
EOT_ID = 126348      # <|eot_id|>, the end of a chat turn
VOCAB_SIZE = 126464  # vocab_size and embedding_size of the released models
