"""One module per resource; each opens with its `router = APIRouter(prefix=..., tags=[...])`."""
