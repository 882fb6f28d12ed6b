/** `tidemark/errors`: the one error tree every entry point throws (docs/errors.md). */
export {
  ERROR_MEANINGS,
  TidemarkError,
  TidemarkErrorBase,
  hasCode,
  type ErrorCode,
  type ErrorDetails,
  type ErrorDetailsMap,
  type TidemarkErrorConstructor,
} from '../errors.js';
export { HTTP_STATUS } from '../api/status.js';
