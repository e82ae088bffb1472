"""dimml clients: a typed HTTP client (sync and async) and batch scoring (`python -m clients score`).

    from clients import Client
    with Client("http://localhost:3000") as c:
        print(c.predict("clip.mp4").label)

Importing this package is light (httpx only); local scoring loads the model when asked.
"""
from clients.http import AsyncClient, Client, ClientError, RequestTimeout, RetryPolicy, ServerError, ServerUnreachable
from clients.result import BranchResult, Prediction

__all__ = ["Client", "AsyncClient", "RetryPolicy", "ClientError", "ServerError", "ServerUnreachable",
           "RequestTimeout", "Prediction", "BranchResult"]
