"""Mass regression from CMS end-to-end images with a DeepViT: data, model, train, evaluate, predict."""
__version__ = "0.1.0"
