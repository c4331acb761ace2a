"""Mass regression from CMS end-to-end images (DeepViT, hybrid DeepViT, ResNet): data, model, train,
evaluate, predict."""
__version__ = "0.1.0"
