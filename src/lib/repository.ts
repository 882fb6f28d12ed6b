/** `tidemark/repository`: the deduplicating, encrypting backup repository (docs/library.md, docs/formats/repository.md). */
export * from '../repository/index.js';
