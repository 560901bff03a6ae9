"""Data edge: bundled real images, FFCV files and loaders, torchvision ImageFolder fallback."""
