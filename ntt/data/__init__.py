"""Dataset I/O: image loading exactly as the reference, COCO json helpers, masks, class splits."""
