"""Reference policies built from the data: supervised fine-tuning (:mod:`.finetune`), a reference from nothing
(:mod:`.scratch`), and the reviews world's pairs sampled from a reference (:mod:`.reviews`)."""
