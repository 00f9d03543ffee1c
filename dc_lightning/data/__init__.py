"""Example data modules: Fashion-MNIST, ImageFolder, fake images (images.py) and the fortunes text corpus (text.py)."""
