"""Stage 3, data: the preprocessed training cache and what reads it.

``preprocess`` (:mod:`.cache`) runs every case of an ISLES-layout folder once through the
inference preprocessing and stores network-ready arrays with a fixed train/val/test split;
:mod:`.dataset` memory-maps that cache as a replayable sample stream with augmentation.

Imports nothing from the later stages.
"""
