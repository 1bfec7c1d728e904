"""The one reader of weight files, one room per source with its rename table beside its reader:

- `hf.py`: Hugging Face folders (ViT, DeiT, DINOv2) and HF-named state dicts;
- `timm.py`: timm state-dict files, the `.pth.tar` its train.py writes included;
- `npz.py`: Google's JAX/Flax `.npz` (the first ImageNet-21k release, AugReg, big_vision);
- `project.py`: this project's own last.pt / best.pt and run folders (resume reads last.pt there too);
- `core.py`: what they share: the safe reader, the rename machinery, the architecture from shapes,
  the copy loop and the load report;
- `load.py`: `load_pretrained`, which picks the reader and builds the model (`from_pretrained` calls it).

References: timm's `_load_weights` and `checkpoint_filter_fn` (models/vision_transformer.py);
transformers' `convert_vit_timm_to_pytorch.py`; big_vision's models/vit.py for the `params/` naming.
"""
