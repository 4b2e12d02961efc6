"""engine/caching"""
