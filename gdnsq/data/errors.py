"""The one exception the data edge raises for bad inputs."""


class DataError(ValueError):
    """Unusable data (missing path, empty ImageFolder, corrupt .beton); the message is one line and names the path."""
