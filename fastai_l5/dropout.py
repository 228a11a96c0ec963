"(placeholder while this module is being written)"
__all__ = []
