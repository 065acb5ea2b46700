"""tripmesh: the generated v1 contract (tripmesh.v1) and the runtime both sides share."""
