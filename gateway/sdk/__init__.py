"""The SDK for app developers (`client`: GatewayClient) and platform services (`publisher`: Publisher).

Public import paths: `from gateway import Publisher` and `from gateway.client import GatewayClient`.
"""
