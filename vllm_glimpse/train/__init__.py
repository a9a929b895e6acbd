"""Training for measurable accuracy: a small vision-language model trained on real images
(:mod:`.vlm`, on easy-vqa mosaics of :mod:`.mosaic`). Needs the ``train`` extra (easy-vqa)."""
